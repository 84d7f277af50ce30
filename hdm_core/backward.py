"""When the layers' hand-written backward passes (norm, gated SiLU, RoPE) replace autograd's chain of plain ops.

They cut passes over the activations of an fp32 training step (`python -m bench.core`, README "Benchmarks").
Everything else takes the plain ops, whose forward values are the same: no graph to save (inference), torch.compile
(inductor fuses the chain itself), autocast or a low-precision model (mixed dtypes would meet in the backward).
"""

from __future__ import annotations

import torch
from torch import Tensor


def hand_backward(*tensors: Tensor) -> bool:
    """Whether a layer with these activations takes its `torch.autograd.Function`."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    device = tensors[0].device.type
    return not torch.is_autocast_enabled(device) and all(t.dtype == torch.float32 for t in tensors)
