"""The one dtype setting (`HDM_DTYPE`, `--dtype`, `HDMPipeline(dtype=...)`) and how it resolves per device."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

DTypeSetting = Literal["auto", "fp32", "bf16", "fp16"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(setting: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """`auto` (or None) = bf16 on CUDA, fp32 elsewhere; "fp32"/"bf16"/"fp16" (or the long names, or a torch
    dtype) are taken as given. Raises ValueError naming the setting and the accepted values."""
    if isinstance(setting, torch.dtype):
        if setting not in DTYPES.values():
            raise ValueError(f"dtype {setting} is not supported; use one of {list(get_args(DTypeSetting))}")
        return setting
    name = "auto" if setting is None else str(setting).strip().lower()
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(get_args(DTypeSetting))}, got {setting!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the short setting name ("fp32", "bf16", "fp16")."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def default_train_precision(device: torch.device | str) -> Literal["fp32", "bf16"]:
    """Train jobs: bf16 autocast (fp32 master weights) on CUDA, fp32 on CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def train_precision(setting: str, device: torch.device | str) -> str:
    """A train job's `[train] precision`: "auto" resolves with `default_train_precision`, others are kept."""
    return default_train_precision(device) if setting == "auto" else setting


def cast_model(model: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """model.to(device, dtype), except the frequency tensors (`time_emb.freqs`, every `*.rope.freqs`) stay fp32.

    Why: they are multiplied by 1000 t and by positions before a sin/cos; rounded to bf16 (8 mantissa bits) the
    phases move by up to ~4 rad for the timestep and ~0.1 rad for RoPE, a 10 % error of the whole output that has
    nothing to do with the matmul precision. Both are computed in fp32 anyway (spec §1.2, §2)."""
    keep = {name: t.detach().float().clone() for name, t in _frequency_tensors(model)}
    model.to(device=device, dtype=dtype)
    for name, t in _frequency_tensors(model):
        t.data = keep[name].to(t.device)
    return model


def _frequency_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return [(n, t) for n, t in named.items() if n.split(".")[-1] == "freqs"]
