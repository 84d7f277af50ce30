"""Opt-in torch.compile of the XUT, warmed up per shape (CUDA graphs only on CUDA)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from .model import XUT

CompileMode = Literal["off", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"]
_CUDA_GRAPH_MODES = {"reduce-overhead", "max-autotune"}


def compile_model(
    model: XUT, mode: CompileMode = "default", *, device: torch.device | str = "cpu"
) -> nn.Module:
    """`model` itself for "off", else a compiled wrapper sharing its parameters (state_dict keys gain no prefix on
    the original module). "reduce-overhead"/"max-autotune" capture CUDA graphs: CUDA only, shapes must repeat.
    Compilation happens lazily on the first call of each new input shape: call `warm_up` before serving."""
    if mode not in get_args(CompileMode):
        raise ValueError(f"compile mode must be one of {list(get_args(CompileMode))}, got {mode!r}")
    if mode == "off":
        return model
    if mode in _CUDA_GRAPH_MODES and torch.device(device).type != "cuda":
        raise ValueError(f"compile mode {mode!r} uses CUDA graphs and needs a CUDA device, got {device}")
    # CUDA graphs need static shapes (one graph per batch, size and text length); the other modes let dynamo mark a
    # dimension dynamic once it has seen it change, so prompts of new lengths do not recompile forever.
    return torch.compile(model, mode=mode, dynamic=False if mode in _CUDA_GRAPH_MODES else None)
