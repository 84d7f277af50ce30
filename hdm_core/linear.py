"""nn.Linear whose fp32 CPU matmuls run through oneDNN instead of the BLAS that `F.linear` calls, on AMD CPUs.

Why: PyTorch's fp32 `addmm` on CPU calls MKL sgemm, which takes a slow generic path on AMD CPUs; oneDNN's JIT
kernels do not (measured ~2x on the forward and ~1.7x on both backward products on an AMD EPYC, `bench/core.py`).
On Intel CPUs MKL is as fast or faster (an AVX-512 Xeon: oneDNN 0.5-1.0x of MKL on the forward and backward of
XUT's layer shapes), so there `F.linear` stays. The arithmetic is still IEEE fp32, only the summation order differs
(relative error ~1e-6); the choice depends on the CPU only, so one machine always takes the same path (resume stays
bit-exact). Parameters and state-dict keys are exactly nn.Linear's, so checkpoints are unchanged. Everything else
(CUDA, bf16/fp16, CPU autocast, torch.compile tracing, a build without oneDNN) takes the ordinary `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("AuthenticAMD", "GenuineIntel", ...), "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


_ENABLED = onednn_available() and cpu_vendor() == "AuthenticAMD"
# Below ~32 rows (the [B, 1, D] adaLN and timestep MLPs) oneDNN's per-call overhead loses to BLAS (measured 0.3-0.6x).
_MIN_ROWS = 32


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., in] @ weight[out, in]^T + bias -> [..., out] through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(grad, weight.t().contiguous(), None)  # (..., in)
        if ctx.needs_input_grad[1]:
            gw = _mm(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (out, in) = grad^T x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def use_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` takes the oneDNN path for these operands."""
    return (
        _ENABLED
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() >= _MIN_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` through oneDNN (fp32 CPU tensors, a build with oneDNN), differentiable."""
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _OneDnnLinear.apply(x, weight, bias)
    return _mm(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Same contract as `F.linear`."""
    if not use_onednn(x, weight):
        return F.linear(x, weight, bias)
    return onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """Drop-in nn.Linear (same parameters, init and state-dict keys) that calls `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
